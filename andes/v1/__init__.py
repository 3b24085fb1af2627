"""Generated protobuf and gRPC code of the andes.v1 contract (protos/andes/v1; `make protos`)."""
