"""PulseAudio and PipeWire: PCM streams (libpulse-simple), devices (pulsectl), private daemons."""
