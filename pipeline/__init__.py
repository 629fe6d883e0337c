"""densenet-pipe: DenseNets on Ray, fed by FFCV, tracked in W&B."""
