"""kernelhub.backends: attention backend and layer kernel implementations (the declaration
API they implement is `kernelhub.declare`)."""
