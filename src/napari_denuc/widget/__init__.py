"""The napari dock widget and its helpers.

Importing this package is cheap: Qt is imported by ``widget._widget`` and the job modules it is
made of (see its docstring), torch only when a model is first needed.
"""
