"""c40: compact CIFAR-10 CNNs (<200k params, no MaxPool, dilated + depthwise-separable convs, GAP)."""

__version__ = "0.1.0"
