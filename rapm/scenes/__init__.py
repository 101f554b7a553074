"""The second built-in teacher's world (issue 32): 32x32 RGB procedural scenes drawn from a text prompt.

A scene is one or two shapes (square, triangle) of one colour on a textured background (stripes,
checks or dots, of another colour), in a region of the image (left, right, top, bottom or anywhere). Many
images fit each prompt: sizes, positions inside the region, the texture's phase and spacing and small colour
jitter are drawn per image, so a prompt has many modes, and the textures carry high-frequency detail that a
blurry sample loses. Every attribute a prompt names is checkable on the image itself (``check``): no classifier
is trained to say whether a sample obeys its prompt.
"""
