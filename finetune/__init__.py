"""finetune: transfer learning for small image classifiers (MobileNetV2-class backbones)."""

__version__ = "0.1.0"
