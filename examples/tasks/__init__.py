"""What each example trains on and how it uses the trained model: one module per example."""
