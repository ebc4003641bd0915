/* p11bench — loading a PKCS#11 module, finding a token by label, naming return codes. */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "cryptoki.h"

CK_RV bench_module_load(const char *path, bench_module *m, const char **what)
{
	memset(m, 0, sizeof(*m));
	m->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (m->handle == NULL) {
		*what = dlerror();
		return CKR_GENERAL_ERROR;
	}
	CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(m->handle, "C_GetFunctionList");
	if (get == NULL) {
		*what = "dlsym(C_GetFunctionList)";
		dlclose(m->handle);
		return CKR_GENERAL_ERROR;
	}
	CK_RV rv = get(&m->f);
	if (rv != CKR_OK) {
		*what = "C_GetFunctionList";
		dlclose(m->handle);
		return rv;
	}
	CK_C_INITIALIZE_ARGS args = { .flags = CKF_OS_LOCKING_OK };
	rv = m->f->C_Initialize(&args);
	if (rv != CKR_OK) {
		*what = "C_Initialize";
		dlclose(m->handle);
		return rv;
	}
	return CKR_OK;
}

CK_RV bench_module_unload(bench_module *m)
{
	CK_RV rv = CKR_OK;
	if (m->f != NULL)
		rv = m->f->C_Finalize(NULL);
	if (m->handle != NULL)
		dlclose(m->handle);
	memset(m, 0, sizeof(*m));
	return rv;
}

static int label_is(const unsigned char padded[32], const char *label)
{
	size_t n = strlen(label);
	if (n > 32 || memcmp(padded, label, n) != 0)
		return 0;
	for (size_t i = n; i < 32; i++)
		if (padded[i] != ' ' && padded[i] != '\0')
			return 0;
	return 1;
}

CK_RV bench_find_slot(CK_FUNCTION_LIST_PTR f, const char *label, CK_SLOT_ID *slot,
		      const char **what)
{
	CK_SLOT_ID slots[64];
	CK_ULONG count = 64;
	CK_RV rv = f->C_GetSlotList(CK_TRUE, slots, &count);
	if (rv != CKR_OK) {
		*what = "C_GetSlotList";
		return rv;
	}
	for (CK_ULONG i = 0; i < count; i++) {
		CK_TOKEN_INFO info;
		rv = f->C_GetTokenInfo(slots[i], &info);
		if (rv != CKR_OK) {
			*what = "C_GetTokenInfo";
			return rv;
		}
		if (label_is(info.label, label)) {
			*slot = slots[i];
			return CKR_OK;
		}
	}
	*what = "no token with that label";
	return CKR_TOKEN_NOT_PRESENT;
}

CK_RV bench_open_logged_in(CK_FUNCTION_LIST_PTR f, CK_SLOT_ID slot, const char *pin,
			   CK_SESSION_HANDLE *session, const char **what)
{
	CK_RV rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, session);
	if (rv != CKR_OK) {
		*what = "C_OpenSession";
		return rv;
	}
	rv = f->C_Login(*session, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
	if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
		*what = "C_Login";
		f->C_CloseSession(*session);
		return rv;
	}
	return CKR_OK;
}

static const struct {
	CK_RV rv;
	const char *name;
} rv_names[] = {
#define RV(x) { x, #x }
	RV(CKR_OK), RV(CKR_HOST_MEMORY), RV(CKR_SLOT_ID_INVALID), RV(CKR_GENERAL_ERROR),
	RV(CKR_FUNCTION_FAILED), RV(CKR_ARGUMENTS_BAD), RV(CKR_CANT_LOCK),
	RV(CKR_ATTRIBUTE_VALUE_INVALID), RV(CKR_DATA_INVALID), RV(CKR_DATA_LEN_RANGE),
	RV(CKR_DEVICE_ERROR), RV(CKR_DEVICE_MEMORY), RV(CKR_DEVICE_REMOVED),
	RV(CKR_FUNCTION_CANCELED), RV(CKR_FUNCTION_NOT_SUPPORTED), RV(CKR_KEY_HANDLE_INVALID),
	RV(CKR_KEY_TYPE_INCONSISTENT), RV(CKR_KEY_FUNCTION_NOT_PERMITTED),
	RV(CKR_MECHANISM_INVALID), RV(CKR_MECHANISM_PARAM_INVALID),
	RV(CKR_OBJECT_HANDLE_INVALID), RV(CKR_OPERATION_ACTIVE),
	RV(CKR_OPERATION_NOT_INITIALIZED), RV(CKR_PIN_INCORRECT), RV(CKR_SESSION_CLOSED),
	RV(CKR_SESSION_COUNT), RV(CKR_SESSION_HANDLE_INVALID), RV(CKR_SESSION_READ_ONLY),
	RV(CKR_TEMPLATE_INCOMPLETE), RV(CKR_TEMPLATE_INCONSISTENT), RV(CKR_TOKEN_NOT_PRESENT),
	RV(CKR_TOKEN_NOT_RECOGNIZED), RV(CKR_USER_ALREADY_LOGGED_IN),
	RV(CKR_USER_NOT_LOGGED_IN), RV(CKR_USER_TYPE_INVALID), RV(CKR_BUFFER_TOO_SMALL),
	RV(CKR_CRYPTOKI_NOT_INITIALIZED), RV(CKR_CRYPTOKI_ALREADY_INITIALIZED),
	RV(CKR_RANDOM_NO_RNG), RV(CKR_DOMAIN_PARAMS_INVALID),
#undef RV
	{ BENCH_BAD_OUTPUT, "BAD_OUTPUT" },
};

const char *bench_rv_name(CK_RV rv, char *buf, size_t len)
{
	for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++)
		if (rv_names[i].rv == rv)
			return rv_names[i].name;
	snprintf(buf, len, "CKR_0x%lx", (unsigned long)rv);
	return buf;
}
