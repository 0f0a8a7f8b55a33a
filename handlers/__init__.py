"""Tool implementations, one module per family. Which modules load is configuration:
``RELAY_HANDLERS=handlers.call_control,handlers.orders,mycompany.tools``.
"""
