"""Model-card templates, one per system, shipped inside the wheel as package data."""
