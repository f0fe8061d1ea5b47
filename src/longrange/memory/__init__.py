"""State that outlives a forward pass: kNN memories, XL memories, recurrent states."""
