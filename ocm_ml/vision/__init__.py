"""Fashion-MNIST: ResNet18 (1-channel stem, 10 classes), Lightning module, Ray Train DDP driver, predictor."""
