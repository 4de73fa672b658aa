"""dataloaders."""
