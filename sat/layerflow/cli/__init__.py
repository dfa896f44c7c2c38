"""The front door: every command-line entry point of LayerFlow, one module per command."""
