"""What a trained model shows: reconstruction figures and loss curves (`figures`),
`mae visualize` (`visualize`) and `mae anomaly` (`anomaly`). Above checkpoints."""
