"""DenseNet architectures: `spec` (torch-free rules), `densenet` (the nets), `flops`."""
