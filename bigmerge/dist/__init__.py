"""Distribution: the communicator (the only module that knows MPI), the executor and its journal."""
