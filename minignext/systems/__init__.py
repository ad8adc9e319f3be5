"""The systems of the any-to-any family, one file each: every file assembles the flat parts of
`minignext` and loads its system's official checkpoint."""
