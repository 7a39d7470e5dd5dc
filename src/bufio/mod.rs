//! A cache of fixed-size metadata blocks: the only code that reads or writes the metadata device.
