"""The contributor toolkit: `kernelhub kernel init | build | check | publish`."""
