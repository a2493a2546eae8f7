"""maws_fast.train"""
