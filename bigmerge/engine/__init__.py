"""The engine: the communicator (the only module that knows MPI), the block reader, the executor, fault injection."""
