"""The napari dock widget and its helpers.

Importing this package is cheap: Qt is imported by ``widget._widget`` only, torch only when a
model is first needed.
"""
