"""Pictures: colour maps, plots, dataset previews, run reports and video panels."""
