"""The first-boot agent that enrols a node with the registry. Self-contained: stdlib + requests + psutil."""
