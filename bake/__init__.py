"""Burning: seed rendering and lint, images, devices and the wrong-disk guard, writer, manifest."""
