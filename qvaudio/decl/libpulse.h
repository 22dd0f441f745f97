/*
 * The part of libpulse's asynchronous API that qvaudio calls, for cffi's
 * cdef() in ABI mode: no #include, no macros, explicit enum values. Values
 * and layouts are those of <pulse/thread-mainloop.h>, <pulse/context.h>,
 * <pulse/stream.h>, <pulse/introspect.h>, <pulse/sample.h>, <pulse/def.h>
 * and <pulse/error.h>; they are part of the stable libpulse ABI (soname
 * libpulse.so.0, unchanged since PulseAudio 1.0). Structures that libpulse
 * hands out and qvaudio only reads (pa_sink_input_info) are declared up to
 * the last field read: cffi never allocates them.
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

typedef uint32_t pa_volume_t;
typedef struct pa_cvolume {
    uint8_t channels;
    pa_volume_t values[32];
} pa_cvolume;

struct timeval { long tv_sec; long tv_usec; };

typedef struct pa_timing_info {
    struct timeval timestamp;
    int synchronized_clocks;
    pa_usec_t sink_usec;
    pa_usec_t source_usec;
    pa_usec_t transport_usec;
    int playing;
    int write_index_corrupt;
    int64_t write_index;
    int read_index_corrupt;
    int64_t read_index;
    pa_usec_t configured_sink_usec;
    pa_usec_t configured_source_usec;
    int64_t since_underrun;
} pa_timing_info;

typedef struct pa_proplist pa_proplist;
typedef struct pa_mainloop_api pa_mainloop_api;
typedef struct pa_threaded_mainloop pa_threaded_mainloop;
typedef struct pa_context pa_context;
typedef struct pa_stream pa_stream;
typedef struct pa_operation pa_operation;

typedef struct pa_sink_input_info {
    uint32_t index;
    const char *name;
    uint32_t owner_module;
    uint32_t client;
    uint32_t sink;
    pa_sample_spec sample_spec;
    pa_channel_map channel_map;
    pa_cvolume volume;
} pa_sink_input_info;

typedef enum pa_context_state {
    PA_CONTEXT_UNCONNECTED = 0,
    PA_CONTEXT_CONNECTING = 1,
    PA_CONTEXT_AUTHORIZING = 2,
    PA_CONTEXT_SETTING_NAME = 3,
    PA_CONTEXT_READY = 4,
    PA_CONTEXT_FAILED = 5,
    PA_CONTEXT_TERMINATED = 6
} pa_context_state_t;

typedef enum pa_stream_state {
    PA_STREAM_UNCONNECTED = 0,
    PA_STREAM_CREATING = 1,
    PA_STREAM_READY = 2,
    PA_STREAM_FAILED = 3,
    PA_STREAM_TERMINATED = 4
} pa_stream_state_t;

/* pa_context_flags_t */
enum {
    PA_CONTEXT_NOFLAGS = 0,
    PA_CONTEXT_NOAUTOSPAWN = 1,
    PA_CONTEXT_NOFAIL = 2
};

/* pa_stream_flags_t */
enum {
    PA_STREAM_NOFLAGS = 0,
    PA_STREAM_START_CORKED = 1,
    PA_STREAM_INTERPOLATE_TIMING = 2,
    PA_STREAM_NOT_MONOTONIC = 4,
    PA_STREAM_AUTO_TIMING_UPDATE = 8,
    PA_STREAM_NO_REMAP_CHANNELS = 16,
    PA_STREAM_NO_REMIX_CHANNELS = 32,
    PA_STREAM_FIX_FORMAT = 64,
    PA_STREAM_FIX_RATE = 128,
    PA_STREAM_FIX_CHANNELS = 256,
    PA_STREAM_DONT_MOVE = 512,
    PA_STREAM_VARIABLE_RATE = 1024,
    PA_STREAM_PEAK_DETECT = 2048,
    PA_STREAM_START_MUTED = 4096,
    PA_STREAM_ADJUST_LATENCY = 8192,
    PA_STREAM_EARLY_REQUESTS = 16384,
    PA_STREAM_DONT_INHIBIT_AUTO_SUSPEND = 32768,
    PA_STREAM_START_UNMUTED = 65536,
    PA_STREAM_FAIL_ON_SUSPEND = 131072,
    PA_STREAM_RELATIVE_VOLUME = 262144,
    PA_STREAM_PASSTHROUGH = 524288
};

typedef enum pa_seek_mode {
    PA_SEEK_RELATIVE = 0,
    PA_SEEK_ABSOLUTE = 1,
    PA_SEEK_RELATIVE_ON_READ = 2,
    PA_SEEK_RELATIVE_END = 3
} pa_seek_mode_t;

typedef enum pa_update_mode {
    PA_UPDATE_SET = 0,
    PA_UPDATE_MERGE = 1,
    PA_UPDATE_REPLACE = 2
} pa_update_mode_t;

typedef void (*pa_context_notify_cb_t)(pa_context *c, void *userdata);
typedef void (*pa_context_success_cb_t)(pa_context *c, int success, void *userdata);
typedef void (*pa_stream_notify_cb_t)(pa_stream *s, void *userdata);
typedef void (*pa_stream_request_cb_t)(pa_stream *s, size_t nbytes, void *userdata);
typedef void (*pa_stream_success_cb_t)(pa_stream *s, int success, void *userdata);
typedef void (*pa_sink_input_info_cb_t)(pa_context *c, const pa_sink_input_info *i, int eol,
                                        void *userdata);
typedef void (*pa_free_cb_t)(void *p);

/* The threaded main loop: its own thread, one lock, one condition. */
pa_threaded_mainloop *pa_threaded_mainloop_new(void);
int pa_threaded_mainloop_start(pa_threaded_mainloop *m);
void pa_threaded_mainloop_stop(pa_threaded_mainloop *m);
void pa_threaded_mainloop_lock(pa_threaded_mainloop *m);
void pa_threaded_mainloop_unlock(pa_threaded_mainloop *m);
void pa_threaded_mainloop_wait(pa_threaded_mainloop *m);
void pa_threaded_mainloop_signal(pa_threaded_mainloop *m, int wait_for_accept);
pa_mainloop_api *pa_threaded_mainloop_get_api(pa_threaded_mainloop *m);

pa_proplist *pa_proplist_new(void);
void pa_proplist_free(pa_proplist *p);
int pa_proplist_sets(pa_proplist *p, const char *key, const char *value);

pa_context *pa_context_new_with_proplist(pa_mainloop_api *mainloop, const char *name,
                                         const pa_proplist *proplist);
void pa_context_unref(pa_context *c);
void pa_context_set_state_callback(pa_context *c, pa_context_notify_cb_t cb, void *userdata);
int pa_context_errno(const pa_context *c);
pa_context_state_t pa_context_get_state(const pa_context *c);
int pa_context_connect(pa_context *c, const char *server, int flags, const void *api);
void pa_context_disconnect(pa_context *c);
pa_operation *pa_context_get_sink_input_info(pa_context *c, uint32_t idx,
                                             pa_sink_input_info_cb_t cb, void *userdata);
pa_operation *pa_context_set_sink_input_volume(pa_context *c, uint32_t idx,
                                               const pa_cvolume *volume,
                                               pa_context_success_cb_t cb, void *userdata);

pa_stream *pa_stream_new_with_proplist(pa_context *c, const char *name, const pa_sample_spec *ss,
                                       const pa_channel_map *map, pa_proplist *p);
void pa_stream_unref(pa_stream *s);
pa_stream_state_t pa_stream_get_state(const pa_stream *p);
pa_context *pa_stream_get_context(const pa_stream *p);
uint32_t pa_stream_get_index(const pa_stream *s);
int pa_stream_connect_playback(pa_stream *s, const char *dev, const pa_buffer_attr *attr,
                               int flags, const pa_cvolume *volume, pa_stream *sync_stream);
int pa_stream_connect_record(pa_stream *s, const char *dev, const pa_buffer_attr *attr,
                             int flags);
int pa_stream_disconnect(pa_stream *s);
int pa_stream_write(pa_stream *p, const void *data, size_t nbytes, pa_free_cb_t free_cb,
                    int64_t offset, pa_seek_mode_t seek);
int pa_stream_peek(pa_stream *p, const void **data, size_t *nbytes);
int pa_stream_drop(pa_stream *p);
size_t pa_stream_writable_size(const pa_stream *p);
size_t pa_stream_readable_size(const pa_stream *p);
pa_operation *pa_stream_drain(pa_stream *s, pa_stream_success_cb_t cb, void *userdata);
pa_operation *pa_stream_flush(pa_stream *s, pa_stream_success_cb_t cb, void *userdata);
pa_operation *pa_stream_update_sample_rate(pa_stream *s, uint32_t rate,
                                           pa_stream_success_cb_t cb, void *userdata);
void pa_stream_set_state_callback(pa_stream *s, pa_stream_notify_cb_t cb, void *userdata);
void pa_stream_set_write_callback(pa_stream *p, pa_stream_request_cb_t cb, void *userdata);
void pa_stream_set_read_callback(pa_stream *p, pa_stream_request_cb_t cb, void *userdata);
void pa_stream_set_underflow_callback(pa_stream *p, pa_stream_notify_cb_t cb, void *userdata);
void pa_stream_set_latency_update_callback(pa_stream *p, pa_stream_notify_cb_t cb,
                                           void *userdata);
int pa_stream_get_latency(pa_stream *s, pa_usec_t *r_usec, int *negative);
const pa_timing_info *pa_stream_get_timing_info(pa_stream *s);
pa_operation *pa_stream_update_timing_info(pa_stream *p, pa_stream_success_cb_t cb,
                                          void *userdata);

void pa_operation_unref(pa_operation *o);
void pa_operation_cancel(pa_operation *o);

const char *pa_strerror(int error);
pa_channel_map *pa_channel_map_parse(pa_channel_map *map, const char *s);
char *pa_channel_map_snprint(char *s, size_t l, const pa_channel_map *map);
