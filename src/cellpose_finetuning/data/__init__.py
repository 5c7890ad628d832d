"""Where training data comes from: pairing file names, local folders, artifacts."""
