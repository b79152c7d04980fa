"""The CLI agents e2a runs, by the name the API gives them."""
