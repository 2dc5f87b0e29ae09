"""Serving backends behind one interface: how an `AppConfig` becomes a Serve application and back."""
