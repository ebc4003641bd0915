/* p11p client — the key and logins kept for a restarted daemon; see kept.h. */
#include <string.h>
#include <sys/mman.h>

#include "debug.h"
#include "kept.h"
#include "state.h"

#define LOGINS 16

struct login {
	int used;
	CK_SLOT_ID slot;
	CK_USER_TYPE user;
	size_t len;
	unsigned char pin[P11P_PIN_MAX];
};

struct vault {
	int have_key;
	unsigned char key[P11P_KEY_SIZE];
	struct login login[LOGINS];
};

static struct vault *vault; /* mapped at first use, for the life of the process */

static int lock(void)
{
	return p11p_lock_acquire(&p11p_state.lock) == CKR_OK;
}

static void unlock(void)
{
	p11p_lock_release(&p11p_state.lock);
}

/* Under the lock: the vault, mapped and locked on first use (NULL: no memory). */
static struct vault *open_vault(void)
{
	void *p;

	if (vault != NULL)
		return vault;
	p = mmap(NULL, sizeof *vault, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	if (mlock(p, sizeof *vault) != 0)
		p11p_debug("the kept PIN's memory could not be locked (RLIMIT_MEMLOCK)");
	(void)madvise(p, sizeof *vault, MADV_DONTDUMP);
	(void)madvise(p, sizeof *vault, MADV_WIPEONFORK);
	vault = p;
	return vault;
}

static void wipe_login(struct login *l)
{
	explicit_bzero(l, sizeof *l);
}

/* A login kept in place of what l held; a PIN that cannot be kept leaves l empty (a
 * next daemon then cannot log in: the application logs in again). */
static void store(struct login *l, CK_SLOT_ID slot, CK_USER_TYPE user, const CK_UTF8CHAR *pin,
		  CK_ULONG len)
{
	wipe_login(l);
	if (pin != NULL && len <= P11P_PIN_MAX) {
		l->used = 1;
		l->slot = slot;
		l->user = user;
		l->len = len;
		memcpy(l->pin, pin, len);
	}
}

static struct login *find(struct vault *v, CK_SLOT_ID slot)
{
	for (unsigned i = 0; i < LOGINS; i++)
		if (v->login[i].used && v->login[i].slot == slot)
			return &v->login[i];
	return NULL;
}

void p11p_kept_key(const unsigned char key[P11P_KEY_SIZE])
{
	struct vault *v;

	if (!lock())
		return;
	v = open_vault();
	if (v != NULL && (!v->have_key || memcmp(v->key, key, P11P_KEY_SIZE) != 0)) {
		memcpy(v->key, key, P11P_KEY_SIZE);
		v->have_key = 1;
	}
	unlock();
}

void p11p_kept_login(CK_SLOT_ID slot, CK_USER_TYPE user, const CK_UTF8CHAR *pin, CK_ULONG len)
{
	struct vault *v;
	struct login *l;

	if (!lock())
		return;
	v = open_vault();
	l = v != NULL ? find(v, slot) : NULL;
	for (unsigned i = 0; v != NULL && l == NULL && i < LOGINS; i++)
		if (!v->login[i].used)
			l = &v->login[i];
	if (l != NULL)
		store(l, slot, user, pin, len);
	unlock();
}

void p11p_kept_set_pin(CK_SLOT_ID slot, const CK_UTF8CHAR *pin, CK_ULONG len)
{
	struct login *l;

	if (!lock())
		return;
	l = vault != NULL ? find(vault, slot) : NULL;
	if (l != NULL)
		store(l, slot, l->user, pin, len);
	unlock();
}

void p11p_kept_logout(CK_SLOT_ID slot)
{
	struct login *l;

	if (!lock())
		return;
	l = vault != NULL ? find(vault, slot) : NULL;
	if (l != NULL)
		wipe_login(l);
	unlock();
}

void p11p_kept_wipe(int nolock)
{
	if (!nolock && !lock())
		return;
	if (vault != NULL)
		explicit_bzero(vault, sizeof *vault);
	if (!nolock)
		unlock();
}

static int pack_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);

	return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n);
}

int p11p_kept_pack(msgpack_packer *pk)
{
	unsigned n = 0;
	int bad;

	if (!lock())
		return 0;
	if (vault == NULL || !vault->have_key) {
		unlock();
		return 0;
	}
	for (unsigned i = 0; i < LOGINS; i++)
		n += vault->login[i].used != 0;
	bad = pack_str(pk, "resume") || msgpack_pack_map(pk, 2) ||
	      pack_str(pk, "key") || msgpack_pack_bin(pk, P11P_KEY_SIZE) ||
	      msgpack_pack_bin_body(pk, vault->key, P11P_KEY_SIZE) ||
	      pack_str(pk, "logins") || msgpack_pack_array(pk, n);
	for (unsigned i = 0; !bad && i < LOGINS; i++) {
		const struct login *l = &vault->login[i];

		if (l->used)
			bad = msgpack_pack_array(pk, 3) || msgpack_pack_uint64(pk, l->slot) ||
			      msgpack_pack_uint64(pk, l->user) || msgpack_pack_bin(pk, l->len) ||
			      msgpack_pack_bin_body(pk, l->pin, l->len);
	}
	unlock();
	return bad ? -1 : 1;
}
