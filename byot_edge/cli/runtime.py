"""Commands of this area register on `byot_edge.cli.app.app` here."""
