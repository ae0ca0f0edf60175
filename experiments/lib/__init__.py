"""Code the experiment scripts share; nothing here imports a script."""
