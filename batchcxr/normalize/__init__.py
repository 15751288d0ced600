"""Pure image preparation: decoded pixels in, model input out. No I/O here."""
