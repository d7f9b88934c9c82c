"""Textbook references of the losses, one module per kdloss.functional family, written in float64 from the papers."""
