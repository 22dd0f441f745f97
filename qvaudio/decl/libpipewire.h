/* The part of libpipewire-0.3 (0.3.x ABI) that qvaudio's virtual output uses:
 * a thread loop and a pw_stream published as an Audio/Sink or Audio/Source node. Layouts
 * as in pipewire/stream.h and spa/buffer/buffer.h of 0.3.65 (checked once
 * against gcc's sizeof/offsetof of the real headers: pw_stream_events 96,
 * pw_buffer 32, spa_buffer 24, spa_data 40 with data at 24 and chunk at 32);
 * tests/test_pipewire_node.py drives them against a real PipeWire. Enums are
 * passed as int, as the C ABI does. */

struct spa_dict_item { const char *key; const char *value; };
struct spa_dict { uint32_t flags; uint32_t n_items; const struct spa_dict_item *items; };
struct spa_pod { uint32_t size; uint32_t type; };

struct spa_chunk { uint32_t offset; uint32_t size; int32_t stride; int32_t flags; };
struct spa_data {
	uint32_t type;
	uint32_t flags;
	int64_t fd;
	uint32_t mapoffset;
	uint32_t maxsize;
	void *data;
	struct spa_chunk *chunk;
};
struct spa_buffer { uint32_t n_metas; uint32_t n_datas; void *metas; struct spa_data *datas; };
/* requested: since 0.3.49 (SourceNode checks the library's version). */
struct pw_buffer { struct spa_buffer *buffer; void *user_data; uint64_t size; uint64_t requested; };

struct pw_properties;
struct pw_loop;
struct pw_thread_loop;
struct pw_stream;

struct pw_stream_events {
	uint32_t version;
	void (*destroy) (void *data);
	void (*state_changed) (void *data, int old, int state, const char *error);
	void (*control_info) (void *data, uint32_t id, const void *control);
	void (*io_changed) (void *data, uint32_t id, void *area, uint32_t size);
	void (*param_changed) (void *data, uint32_t id, const struct spa_pod *param);
	void (*add_buffer) (void *data, struct pw_buffer *buffer);
	void (*remove_buffer) (void *data, struct pw_buffer *buffer);
	void (*process) (void *data);
	void (*drained) (void *data);
	void (*command) (void *data, const void *command);
	void (*trigger_done) (void *data);
};

void pw_init(int *argc, char **argv[]);
const char *pw_get_library_version(void);

struct pw_properties *pw_properties_new_dict(const struct spa_dict *dict);

struct pw_thread_loop *pw_thread_loop_new(const char *name, const struct spa_dict *props);
void pw_thread_loop_destroy(struct pw_thread_loop *loop);
int pw_thread_loop_start(struct pw_thread_loop *loop);
void pw_thread_loop_stop(struct pw_thread_loop *loop);
void pw_thread_loop_lock(struct pw_thread_loop *loop);
void pw_thread_loop_unlock(struct pw_thread_loop *loop);
struct pw_loop *pw_thread_loop_get_loop(struct pw_thread_loop *loop);

struct pw_stream *pw_stream_new_simple(struct pw_loop *loop, const char *name,
		struct pw_properties *props, const struct pw_stream_events *events, void *data);
void pw_stream_destroy(struct pw_stream *stream);
int pw_stream_connect(struct pw_stream *stream, int direction, uint32_t target_id,
		int flags, const struct spa_pod **params, uint32_t n_params);
int pw_stream_update_params(struct pw_stream *stream, const struct spa_pod **params,
		uint32_t n_params);
uint32_t pw_stream_get_node_id(struct pw_stream *stream);
int pw_stream_set_control(struct pw_stream *stream, uint32_t id, uint32_t n_values,
		float *values, ...);
struct pw_buffer *pw_stream_dequeue_buffer(struct pw_stream *stream);
int pw_stream_queue_buffer(struct pw_stream *stream, struct pw_buffer *buffer);
