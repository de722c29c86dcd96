"""The ``edgespeed`` command line: thin commands over the library."""
