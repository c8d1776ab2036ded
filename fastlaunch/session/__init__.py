"""The notebook's side of an interactive session (`%load_ext fastlaunch`): magics.py, client.py, relay.py."""
