"""spt_core's torch-free pieces (numpy, PIL and the standard library only): the only part of the method
library the edge box may import. Errors, atomic I/O, metrics, the operating point (the line's reject rule), and
THE image -> array conversion.
"""
