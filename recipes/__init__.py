"""Shipped recipes (YAML), installed as the data package ``flashar_adapt.recipes``."""
