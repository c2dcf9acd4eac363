"""onnxconet: a deployment-aware channel-width optimizer for CNNs."""

__version__ = "0.1.0"
