/*
 * The part of libpulse-simple (and pa_strerror from libpulse) that qvaudio
 * calls, for cffi's cdef() in ABI mode: no #include, no macros, explicit
 * enum values. Values and layouts are those of <pulse/simple.h>,
 * <pulse/sample.h>, <pulse/def.h> and <pulse/error.h>; they are part of the
 * stable libpulse ABI (soname libpulse.so.0 / libpulse-simple.so.0).
 */

typedef uint64_t pa_usec_t;

typedef enum pa_sample_format {
    PA_SAMPLE_U8 = 0,
    PA_SAMPLE_ALAW = 1,
    PA_SAMPLE_ULAW = 2,
    PA_SAMPLE_S16LE = 3,
    PA_SAMPLE_S16BE = 4,
    PA_SAMPLE_FLOAT32LE = 5,
    PA_SAMPLE_FLOAT32BE = 6,
    PA_SAMPLE_S32LE = 7,
    PA_SAMPLE_S32BE = 8,
    PA_SAMPLE_S24LE = 9,
    PA_SAMPLE_S24BE = 10,
    PA_SAMPLE_S24_32LE = 11,
    PA_SAMPLE_S24_32BE = 12,
    PA_SAMPLE_INVALID = -1
} pa_sample_format_t;

typedef struct pa_sample_spec {
    pa_sample_format_t format;
    uint32_t rate;
    uint8_t channels;
} pa_sample_spec;

/* <pulse/channelmap.h>: PA_CHANNELS_MAX is 32; positions are an int enum,
 * filled in by pa_channel_map_parse from names ("front-left,front-right"),
 * so no position value is spelled out here. */
typedef int pa_channel_position_t;
typedef struct pa_channel_map {
    uint8_t channels;
    pa_channel_position_t map[32];
} pa_channel_map;

typedef struct pa_buffer_attr {
    uint32_t maxlength;
    uint32_t tlength;
    uint32_t prebuf;
    uint32_t minreq;
    uint32_t fragsize;
} pa_buffer_attr;

typedef enum pa_stream_direction {
    PA_STREAM_NODIRECTION = 0,
    PA_STREAM_PLAYBACK = 1,
    PA_STREAM_RECORD = 2,
    PA_STREAM_UPLOAD = 3
} pa_stream_direction_t;

enum {
    PA_OK = 0,
    PA_ERR_ACCESS = 1,
    PA_ERR_COMMAND = 2,
    PA_ERR_INVALID = 3,
    PA_ERR_EXIST = 4,
    PA_ERR_NOENTITY = 5,
    PA_ERR_CONNECTIONREFUSED = 6,
    PA_ERR_PROTOCOL = 7,
    PA_ERR_TIMEOUT = 8,
    PA_ERR_AUTHKEY = 9,
    PA_ERR_INTERNAL = 10,
    PA_ERR_CONNECTIONTERMINATED = 11,
    PA_ERR_KILLED = 12,
    PA_ERR_INVALIDSERVER = 13,
    PA_ERR_MODINITFAILED = 14,
    PA_ERR_BADSTATE = 15,
    PA_ERR_NODATA = 16,
    PA_ERR_VERSION = 17,
    PA_ERR_TOOLARGE = 18,
    PA_ERR_NOTSUPPORTED = 19,
    PA_ERR_UNKNOWN = 20,
    PA_ERR_NOEXTENSION = 21,
    PA_ERR_OBSOLETE = 22,
    PA_ERR_NOTIMPLEMENTED = 23,
    PA_ERR_FORKED = 24,
    PA_ERR_IO = 25,
    PA_ERR_BUSY = 26
};

typedef struct pa_simple pa_simple;

pa_simple *pa_simple_new(const char *server, const char *name, pa_stream_direction_t dir,
                         const char *dev, const char *stream_name, const pa_sample_spec *ss,
                         const pa_channel_map *map, const pa_buffer_attr *attr, int *error);
void pa_simple_free(pa_simple *s);
int pa_simple_write(pa_simple *s, const void *data, size_t bytes, int *error);
int pa_simple_drain(pa_simple *s, int *error);
int pa_simple_read(pa_simple *s, void *data, size_t bytes, int *error);
pa_usec_t pa_simple_get_latency(pa_simple *s, int *error);
int pa_simple_flush(pa_simple *s, int *error);

/* From libpulse.so.0. */
const char *pa_strerror(int error);
pa_channel_map *pa_channel_map_parse(pa_channel_map *map, const char *s);
char *pa_channel_map_snprint(char *s, size_t l, const pa_channel_map *map);
