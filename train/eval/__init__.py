"""Evaluation of a frozen backbone: the maths, the features, and the reports.

- ``probes``: weighted kNN and linear probes on features already extracted (no I/O);
- ``features``: a checkpoint's backbone(s) and their features over labelled shards, and the
  periodic kNN monitor of a training run;
- ``classify``: ``ssl-cli eval knn`` / ``eval linear`` on a checkpoint, with their JSON reports;
- ``objects``: ``ssl-cli eval objects``, the object-level probes on shards with ground truth.
"""
