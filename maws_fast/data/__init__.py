"""maws_fast.data"""
