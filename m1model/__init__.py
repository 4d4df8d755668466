"""m1model: the MiniMax-M1 architecture on m1 ops (DESIGN 5), and the CISPO trainer (DESIGN 6).

Not built yet: the package exists so the distribution layout is final; the
model, checkpoint loading, generation and training land with their issues.
"""
