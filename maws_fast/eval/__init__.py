"""maws_fast.eval"""
