"""relax.frontend.nn models, one module per architecture family."""
