"""What is made from a finished run: exported backbones and their plots.

- ``export``: ``ssl-cli export``, the backbone alone in timm, torchvision, detectron2 or mmdet
  layout, checked tensor by tensor;
- ``detection``: the key layouts of detectron2 and mmdetection / mmpretrain, and the printed
  config snippets;
- ``plots``: ``ssl-cli plot``, loss terms, learning rate and accuracy of runs.
"""
