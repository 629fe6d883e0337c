"""Ray Tune sweeps over DenseNet architectures and hyperparameters."""
