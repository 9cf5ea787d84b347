"""The active-learning loop (`ltau-lmp learn`): explore with fix ltau, select, label, retrain, resume."""
