"""Applications on top of the library: the `keras-split` command line, the demo
and the network demo. Nothing in the library imports this package."""
