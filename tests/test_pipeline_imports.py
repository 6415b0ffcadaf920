import subprocess
import sys
from pathlib import Path


def test_view_source_workers_do_not_import_torch():
    # every source worker process imports these; torch would cost each ~1-2 s and ~200 MB
    code = "import sys, pipeline.source, pipeline.views; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
