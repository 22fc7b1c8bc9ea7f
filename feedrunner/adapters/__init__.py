"""One module per venue family behind the contract in base.py."""
