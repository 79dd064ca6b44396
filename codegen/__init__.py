"""Renders the kvevents package (generated/kvevents/) from schema/ and codegen/templates/."""
